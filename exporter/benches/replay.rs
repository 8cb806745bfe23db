//! Userspace throughput: event streams in the kernel's ring-buffer format
//! fed through decode → stream → http → identity → attribution → routes →
//! metrics, the agent's own stages (`pipeline::Stages`), on one thread. No
//! kernel is involved: this measures what the agent's CPU does per event.
//!
//! The streams are built here the way the kernel programs write them for
//! the servers this project watches (the shapes were read off captures of
//! gunicorn and wrk in the overhead benchmark):
//! - `keep-alive`: 8 connections, each request one read, the response a
//!   head write and a body write (gunicorn sync under wrk);
//! - `pipelined`: 4 requests per read, their responses one write each;
//! - `churn`: a connection per request (read, 2 writes, close);
//! - `large bodies`: 1 MiB uploads and downloads in 64 KiB syscalls, of
//!   which the kernel copies the first 4 KiB each.
//!
//! Prints, per stream: events/s on one core (thread CPU time), bytes/s, and
//! heap allocations per event (a counting allocator), and checks that every
//! request was counted in `flask_http_request_total`.
//!
//! `cargo bench -p flask-ebpf-exporter --bench replay` replays each stream
//! for ≈ 2 s; under `cargo test` for a moment, as a check.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::TcpListener,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use clap::Parser as _;
use exporter_common::{EventHeader, EventKind};
use flask_ebpf_exporter::{
    capture::decode_event,
    config::Config,
    identity::{
        IdentityStage,
        local::{LocalIdentity, ProcessFilter},
    },
    pipeline::{HandOffs, Stages},
    telemetry::Budgets,
};
use prometheus::Registry;

/// Counts heap allocations, so the steady path's can be reported.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counting beside it does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The kernel's default copy per syscall (`--capture-bytes`).
const CAPTURE_BYTES: usize = 4096;
/// Exchanges are recorded after this many events, as the agent's loop
/// records after each drain of the ring.
const RECORD_EVERY: usize = 1024;

/// Events in ring-buffer format, one after another.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    /// (start, length) of each event in `bytes`.
    events: Vec<(usize, usize)>,
    requests: u64,
    /// Bytes the syscalls moved (not only those copied).
    moved: u64,
}

/// Writes events as the kernel programs do: one connection's sequence
/// numbers and generation, a clock that moves on.
struct Recorder<'a> {
    stream: &'a mut Stream,
    tgid: u32,
    clock_ns: u64,
}

struct Conn {
    fd: u32,
    conn_id: u64,
    seq: u32,
    /// The listening fd + 1, which the kernel puts in the first event.
    listener: u32,
    /// Bytes moved so far, read and written (the events' offsets).
    offsets: [u32; 2],
}

impl Recorder<'_> {
    fn event(&mut self, kind: EventKind, conn: &mut Conn, moved: usize, data: &[u8]) {
        self.clock_ns += 20_000;
        let aux = match kind {
            EventKind::Read | EventKind::Write if conn.seq == 1 => conn.listener,
            _ => 0,
        };
        let captured = &data[..data.len().min(CAPTURE_BYTES)];
        let offset = &mut conn.offsets[usize::from(kind != EventKind::Read)];
        let header = EventHeader {
            kind: kind as u32,
            tgid: self.tgid,
            fd: conn.fd,
            seq: conn.seq,
            conn_id: conn.conn_id,
            timestamp_ns: self.clock_ns,
            byte_count: moved as u32,
            offset: *offset,
            captured_len: captured.len() as u32,
            aux,
            handshake_ns: 0,
            local_port: 8000,
            _pad: 0,
        };
        *offset = offset.wrapping_add(moved as u32);
        conn.seq = conn.seq.wrapping_add(1);
        let start = self.stream.bytes.len();
        self.stream.bytes.extend_from_slice(&header.to_bytes());
        self.stream.bytes.extend_from_slice(captured);
        self.stream
            .events
            .push((start, self.stream.bytes.len() - start));
        self.stream.moved += moved as u64;
    }

    /// The kernel makes no event of an accept: the first read or write
    /// carries its listener.
    fn accept(&mut self, fd: u32, listen_fd: u32) -> Conn {
        self.clock_ns += 1_000;
        Conn {
            fd,
            conn_id: self.clock_ns,
            seq: 1,
            listener: listen_fd + 1,
            offsets: [0; 2],
        }
    }

    fn read(&mut self, conn: &mut Conn, data: &[u8]) {
        self.event(EventKind::Read, conn, data.len(), data);
    }

    fn write(&mut self, conn: &mut Conn, data: &[u8]) {
        self.event(EventKind::Write, conn, data.len(), data);
    }

    /// A syscall that moved `moved` bytes starting with `data`.
    fn io_of(&mut self, kind: EventKind, conn: &mut Conn, moved: usize, data: &[u8]) {
        self.event(kind, conn, moved, data);
    }

    fn close(&mut self, conn: &mut Conn) {
        self.event(EventKind::Close, conn, 0, &[]);
    }
}

/// Paths of an API: some fixed, some with an ID the route learner turns
/// into a parameter.
fn path(n: usize) -> String {
    match n % 4 {
        0 => "/health".to_owned(),
        1 => format!("/api/items/{}", n % 97),
        2 => format!("/api/users/{}/orders?page={}", n % 31, n % 3),
        _ => "/api/search?q=flask".to_owned(),
    }
}

fn request(n: usize) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
        path(n)
    )
}

fn response_head(status: &str, body_len: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nServer: gunicorn\r\nDate: Sun, 29 Nov 2026 07:00:00 GMT\r\n\
         Connection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    )
}

const BODY: &[u8] = br#"{"id": 42, "name": "widget", "ok": true}"#;

fn status(n: usize) -> &'static str {
    if n.is_multiple_of(50) {
        "404 NOT FOUND"
    } else {
        "200 OK"
    }
}

fn keep_alive(recorder: &mut Recorder, listen_fd: u32, requests: usize) {
    let mut conns: Vec<Conn> = (0..8).map(|i| recorder.accept(10 + i, listen_fd)).collect();
    for n in 0..requests {
        let conn = &mut conns[n % 8];
        recorder.read(conn, request(n).as_bytes());
        recorder.write(conn, response_head(status(n), BODY.len()).as_bytes());
        recorder.write(conn, BODY);
    }
    for conn in &mut conns {
        recorder.close(conn);
    }
    recorder.stream.requests += requests as u64;
}

fn pipelined(recorder: &mut Recorder, listen_fd: u32, requests: usize) {
    let mut conn = recorder.accept(10, listen_fd);
    for batch in (0..requests).collect::<Vec<_>>().chunks(4) {
        let reads: String = batch.iter().map(|&n| request(n)).collect();
        recorder.read(&mut conn, reads.as_bytes());
        for &n in batch {
            let mut response = response_head(status(n), BODY.len()).into_bytes();
            response.extend_from_slice(BODY);
            recorder.write(&mut conn, &response);
        }
    }
    recorder.close(&mut conn);
    recorder.stream.requests += requests as u64;
}

fn churn(recorder: &mut Recorder, listen_fd: u32, requests: usize) {
    for n in 0..requests {
        let mut conn = recorder.accept(10 + (n % 8) as u32, listen_fd);
        recorder.read(&mut conn, request(n).as_bytes());
        recorder.write(
            &mut conn,
            response_head(status(n), BODY.len())
                .replace("keep-alive", "close")
                .as_bytes(),
        );
        recorder.write(&mut conn, BODY);
        recorder.close(&mut conn);
    }
    recorder.stream.requests += requests as u64;
}

fn large_bodies(recorder: &mut Recorder, listen_fd: u32, requests: usize) {
    const SIZE: usize = 1 << 20;
    const SYSCALL: usize = 64 * 1024;
    let filler = vec![b'x'; CAPTURE_BYTES];
    let mut conn = recorder.accept(10, listen_fd);
    for n in 0..requests {
        if n % 2 == 0 {
            // An upload: head and the start of the body in the first read.
            let mut first = format!(
                "POST /api/files/{} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n",
                n % 13
            )
            .into_bytes();
            let head_len = first.len();
            first.extend_from_slice(&filler);
            recorder.io_of(EventKind::Read, &mut conn, SYSCALL, &first);
            let mut left = SIZE - (SYSCALL - head_len);
            while left > 0 {
                let moved = left.min(SYSCALL);
                recorder.io_of(EventKind::Read, &mut conn, moved, &filler);
                left -= moved;
            }
            let mut response = response_head("201 CREATED", BODY.len()).into_bytes();
            response.extend_from_slice(BODY);
            recorder.write(&mut conn, &response);
        } else {
            recorder.read(
                &mut conn,
                format!(
                    "GET /api/files/{}/content HTTP/1.1\r\nHost: x\r\n\r\n",
                    n % 13
                )
                .as_bytes(),
            );
            recorder.write(&mut conn, response_head("200 OK", SIZE).as_bytes());
            let mut left = SIZE;
            while left > 0 {
                let moved = left.min(SYSCALL);
                recorder.io_of(EventKind::Write, &mut conn, moved, &filler);
                left -= moved;
            }
        }
    }
    recorder.close(&mut conn);
    recorder.stream.requests += requests as u64;
}

type Scenario = fn(&mut Recorder, u32, usize);

fn record(scenario: Scenario, tgid: u32, listen_fd: u32, requests: usize) -> Stream {
    let mut stream = Stream::default();
    scenario(
        &mut Recorder {
            stream: &mut stream,
            tgid,
            clock_ns: 1_000_000_000,
        },
        listen_fd,
        requests,
    );
    stream
}

fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn requests_counted(registry: &Registry) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "flask_http_request_total")
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}

struct Figures {
    events_per_second: f64,
    requests_per_second: f64,
    bytes_per_second: f64,
    allocations_per_event: f64,
}

/// Replays `stream` through fresh stages until `budget` of CPU is spent
/// (at least twice: the first pass warms routes and series up, the rest is
/// the steady path that is measured).
fn replay(stream: &Stream, budget: Duration) -> Figures {
    // Default flags but route discovery, which reads apps' source off the
    // hot path this measures (and would read whatever process has the
    // recorded pids here).
    let config = Config::try_parse_from(["flask-ebpf-exporter", "--route-discovery", "off"])
        .expect("default flags");
    let registry = Registry::new();
    let budgets = Budgets::register(&registry).expect("metrics");
    let identity = IdentityStage::Local(
        LocalIdentity::new(ProcessFilter::default()).expect("the local servers' thread"),
    );
    let settings = config.settings().expect("valid flags");
    let mut stages = Stages::new(settings.stages, identity, &registry, &budgets).expect("stages");
    let mut hand_offs = HandOffs::default();
    let pass = |stages: &mut Stages, hand_offs: &mut HandOffs| {
        for (i, &(start, len)) in stream.events.iter().enumerate() {
            let event = decode_event(&stream.bytes[start..start + len]).expect("valid event");
            stages.handle(&event, &mut hand_offs.captured);
            stages.table.take_kernel_filters().for_each(drop);
            if i % RECORD_EVERY == RECORD_EVERY - 1 {
                stages.record(hand_offs);
            }
        }
        stages.record(hand_offs);
    };
    pass(&mut stages, &mut hand_offs);
    // The warm-up's first exchanges wait for their server's lookup.
    while stages.attribution.counters().held.get() > 0 {
        std::thread::sleep(Duration::from_millis(1));
        stages.record(&mut hand_offs);
    }
    let (mut passes, mut cpu) = (0u64, Duration::ZERO);
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    while passes == 0 || cpu < budget {
        let started = thread_cpu();
        pass(&mut stages, &mut hand_offs);
        cpu += thread_cpu() - started;
        passes += 1;
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    let counted = requests_counted(&registry);
    assert_eq!(
        counted,
        stream.requests * (passes + 1),
        "every replayed request is counted once"
    );
    let events = stream.events.len() as f64 * passes as f64;
    Figures {
        events_per_second: events / cpu.as_secs_f64(),
        requests_per_second: (stream.requests * passes) as f64 / cpu.as_secs_f64(),
        bytes_per_second: (stream.bytes.len() as f64 * passes as f64) / cpu.as_secs_f64(),
        allocations_per_event: allocations as f64 / events,
    }
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let budget = if full {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(50)
    };
    // The streams' server is this process, listening here, so the identity
    // stage resolves it as it would a real server (through /proc).
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening socket");
    let listen_fd = listener.as_raw_fd() as u32;
    let tgid = std::process::id();
    let scenarios: [(&str, Scenario, usize); 4] = [
        ("keep-alive", keep_alive, 4_000),
        ("pipelined", pipelined, 4_000),
        ("churn", churn, 2_000),
        ("large bodies", large_bodies, 20),
    ];
    println!(
        "{:<14} {:>8} {:>8} {:>14} {:>12} {:>10} {:>12}",
        "stream", "events", "req", "events/s/core", "req/s/core", "MB/s", "allocs/event"
    );
    for (name, scenario, requests) in scenarios {
        let stream = record(scenario, tgid, listen_fd, requests);
        let figures = replay(&stream, budget);
        println!(
            "{:<14} {:>8} {:>8} {:>14.0} {:>12.0} {:>10.1} {:>12.2}",
            name,
            stream.events.len(),
            stream.requests,
            figures.events_per_second,
            figures.requests_per_second,
            figures.bytes_per_second / 1e6,
            figures.allocations_per_event,
        );
    }
    drop(listener);
}
