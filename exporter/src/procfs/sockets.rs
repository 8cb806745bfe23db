//! The sockets a process holds, and the TCP tables of its network
//! namespace, read within bounds.
//!
//! A process decides how many descriptors it holds, and the processes of
//! its network namespace how many rows its TCP tables have (a pod's
//! connections in TIME_WAIT alone can be tens of thousands). So every scan
//! stops at [`MAX_ROWS`] rows, [`MAX_DESCRIPTORS`] descriptors or
//! [`MAX_TIME`], answers with what it saw and says it was cut (counted
//! through [`count_cut_scans_in`]). Listening sockets come first in the
//! kernel's tables, so what only needs listeners stops at the first row
//! that is not one and never reads the connections.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{BufRead as _, BufReader},
    ops::ControlFlow,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use procfs::{
    FromReadSI as _,
    net::{TcpNetEntries, TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};
use prometheus::IntCounter;
use tracing::{debug, warn};

/// TCP table rows one scan reads at most.
pub const MAX_ROWS: usize = 65_536;
/// Descriptors one scan looks at at most.
pub const MAX_DESCRIPTORS: usize = 65_536;
/// How long one scan may take.
pub const MAX_TIME: Duration = Duration::from_millis(50);
/// Rows a scan made on a thread of its own reads at most ([`tcp_sockets_held`]):
/// only CPU is at stake there, and a busy namespace's TIME_WAIT rows alone
/// reach the kernel's default bound of 262,144.
pub const MAX_ROWS_OFF_THREAD: usize = 1 << 20;
/// How long a scan made on a thread of its own may take.
pub const MAX_TIME_OFF_THREAD: Duration = Duration::from_secs(1);

/// How much one scan may read.
#[derive(Clone, Copy, Debug)]
struct Bound {
    rows: usize,
    descriptors: usize,
    time: Duration,
}

const BOUND: Bound = Bound {
    rows: MAX_ROWS,
    descriptors: MAX_DESCRIPTORS,
    time: MAX_TIME,
};

const OFF_THREAD: Bound = Bound {
    rows: MAX_ROWS_OFF_THREAD,
    descriptors: MAX_DESCRIPTORS,
    time: MAX_TIME_OFF_THREAD,
};

/// Rows handed to the table parser at once.
const ROWS_PER_PARSE: usize = 256;
/// `st` of a listening socket in the kernel's TCP tables.
const LISTEN_STATE: &str = "0A";

static CUT_SCANS: OnceLock<IntCounter> = OnceLock::new();
static CUT_LOGGED: AtomicBool = AtomicBool::new(false);

/// Where scans cut at their bounds are counted (set once, at start).
pub fn count_cut_scans_in(counter: IntCounter) {
    let _ = CUT_SCANS.set(counter);
}

/// What a scan found, and whether it looked at everything it had to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned<T> {
    pub found: T,
    /// `false`: cut at a bound, so what is not in `found` may still be so.
    pub complete: bool,
}

impl<T> Scanned<T> {
    fn new(found: T, complete: bool, tgid: u32, what: &'static str, bound: Bound) -> Self {
        if !complete {
            if let Some(counter) = CUT_SCANS.get() {
                counter.inc();
            }
            if CUT_LOGGED.swap(true, Ordering::Relaxed) {
                debug!(tgid, what, "a /proc scan stopped at its bound");
            } else {
                warn!(
                    tgid,
                    what,
                    max_rows = bound.rows,
                    max_descriptors = bound.descriptors,
                    max_time_ms = bound.time.as_millis() as u64,
                    "a /proc scan stopped at its bound: this process holds, or its network \
                     namespace has, more sockets than one scan reads (counted in \
                     flask_ebpf_exporter_budget_exhausted_total{{budget=\"proc_scan\"}}; later ones \
                     are logged at debug level)"
                );
            }
        }
        Scanned { found, complete }
    }
}

/// One socket of `/proc/<pid>/net/tcp{,6}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub listening: bool,
    pub inode: u64,
}

impl From<&TcpNetEntry> for TcpSocket {
    fn from(entry: &TcpNetEntry) -> Self {
        TcpSocket {
            local_port: entry.local_address.port(),
            listening: entry.state == TcpState::Listen,
            inode: entry.inode,
        }
    }
}

/// Which rows of the TCP tables a scan needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Listening sockets only: the first rows of each table.
    Listening,
    All,
}

/// Visits the rows of the TCP tables (IPv4, then IPv6) in the network
/// namespace of `tgid` until `visit` breaks; whether it was not cut.
fn visit_tcp_rows(
    tgid: u32,
    rows: Rows,
    bound: Bound,
    mut visit: impl FnMut(TcpSocket) -> ControlFlow<()>,
) -> bool {
    let deadline = Instant::now() + bound.time;
    let mut read = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(file) = File::open(format!("/proc/{tgid}/net/{table}")) else {
            continue;
        };
        let mut lines = BufReader::new(file).lines();
        let Some(Ok(header)) = lines.next() else {
            continue;
        };
        let mut batch = Batch::new(header);
        for line in lines {
            let Ok(line) = line else { break };
            if rows == Rows::Listening && line.split_whitespace().nth(3) != Some(LISTEN_STATE) {
                break;
            }
            if read >= bound.rows || Instant::now() >= deadline {
                return batch.visit(&mut visit).is_break();
            }
            read += 1;
            if batch.push(&line) >= ROWS_PER_PARSE && batch.visit(&mut visit).is_break() {
                return true;
            }
        }
        if batch.visit(&mut visit).is_break() {
            return true;
        }
    }
    true
}

/// Rows waiting to go through procfs's table parser, under their table's
/// header.
struct Batch {
    text: String,
    header_len: usize,
    rows: usize,
}

impl Batch {
    fn new(mut header: String) -> Self {
        header.push('\n');
        Batch {
            header_len: header.len(),
            text: header,
            rows: 0,
        }
    }

    /// Adds a row; the rows now waiting.
    fn push(&mut self, row: &str) -> usize {
        self.text.push_str(row);
        self.text.push('\n');
        self.rows += 1;
        self.rows
    }

    /// Parses the waiting rows and visits their sockets (a batch the parser
    /// refuses is skipped).
    fn visit(&mut self, visit: &mut impl FnMut(TcpSocket) -> ControlFlow<()>) -> ControlFlow<()> {
        if self.rows == 0 {
            return ControlFlow::Continue(());
        }
        let parsed = TcpNetEntries::from_read(self.text.as_bytes(), procfs::current_system_info());
        self.text.truncate(self.header_len);
        self.rows = 0;
        match parsed {
            Ok(entries) => entries
                .0
                .iter()
                .try_for_each(|entry| visit(TcpSocket::from(entry))),
            Err(error) => {
                debug!(%error, "rows of a TCP table did not parse");
                ControlFlow::Continue(())
            }
        }
    }
}

/// Visits the socket inodes among `tgid`'s descriptors until `visit`
/// breaks; whether it was not cut.
fn visit_socket_inodes(
    tgid: u32,
    bound: Bound,
    mut visit: impl FnMut(u64) -> ControlFlow<()>,
) -> bool {
    let Some(descriptors) = process(tgid).and_then(|process| process.fd().ok()) else {
        return true;
    };
    let deadline = Instant::now() + bound.time;
    for (n, descriptor) in descriptors.enumerate() {
        if n >= bound.descriptors || Instant::now() >= deadline {
            return false;
        }
        if let Ok(info) = descriptor
            && let FDTarget::Socket(inode) = info.target
            && visit(inode).is_break()
        {
            return true;
        }
    }
    true
}

fn process(tgid: u32) -> Option<Process> {
    Process::new(i32::try_from(tgid).ok()?).ok()
}

/// Inode of the socket behind a process's fd.
pub fn socket_inode(tgid: u32, fd: u32) -> Option<u64> {
    let info = process(tgid)?.fd_from_fd(i32::try_from(fd).ok()?).ok()?;
    match info.target {
        FDTarget::Socket(inode) => Some(inode),
        _ => None,
    }
}

/// Inodes of the sockets a process holds.
pub fn socket_inodes(tgid: u32) -> Scanned<HashSet<u64>> {
    socket_inodes_within(tgid, BOUND)
}

fn socket_inodes_within(tgid: u32, bound: Bound) -> Scanned<HashSet<u64>> {
    let mut inodes = HashSet::new();
    let complete = visit_socket_inodes(tgid, bound, |inode| {
        inodes.insert(inode);
        ControlFlow::Continue(())
    });
    Scanned::new(inodes, complete, tgid, "descriptors", bound)
}

/// Whether a process holds the socket `inode`.
pub fn holds_socket(tgid: u32, inode: u64) -> Scanned<bool> {
    let mut held = false;
    let complete = visit_socket_inodes(tgid, BOUND, |seen| {
        held = seen == inode;
        if held {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    Scanned::new(held, complete, tgid, "descriptors", BOUND)
}

/// The listening TCP sockets (v4 and v6) in the network namespace of
/// `tgid`: inode → local port.
pub fn listening_sockets(tgid: u32) -> Scanned<HashMap<u64, u16>> {
    let mut listening = HashMap::new();
    let complete = visit_tcp_rows(tgid, Rows::Listening, BOUND, |socket| {
        if socket.listening {
            listening.insert(socket.inode, socket.local_port);
        }
        ControlFlow::Continue(())
    });
    Scanned::new(listening, complete, tgid, "listening sockets", BOUND)
}

/// The port the listening socket `inode` in the network namespace of
/// `tgid` serves.
pub fn listener_port(tgid: u32, inode: u64) -> Scanned<Option<u16>> {
    let mut port = None;
    let complete = visit_tcp_rows(tgid, Rows::Listening, BOUND, |socket| {
        if socket.inode == inode {
            port = Some(socket.local_port);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    Scanned::new(port, complete, tgid, "listening sockets", BOUND)
}

/// The TCP sockets a process holds: its listening ones (inode → local
/// port) and the local ports of the others (its connections; an accepted
/// one has its listener's port).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeldTcpSockets {
    pub listening: HashMap<u64, u16>,
    pub connection_ports: HashSet<u16>,
}

/// Made on a thread of its own: within the wider bounds of such scans.
pub fn tcp_sockets_held(tgid: u32) -> Scanned<HeldTcpSockets> {
    let inodes = socket_inodes_within(tgid, OFF_THREAD);
    let mut held = HeldTcpSockets::default();
    let complete = visit_tcp_rows(tgid, Rows::All, OFF_THREAD, |socket| {
        if inodes.found.contains(&socket.inode) {
            if socket.listening {
                held.listening.insert(socket.inode, socket.local_port);
            } else {
                held.connection_ports.insert(socket.local_port);
            }
        }
        ControlFlow::Continue(())
    });
    Scanned::new(
        held,
        complete && inodes.complete,
        tgid,
        "TCP sockets",
        OFF_THREAD,
    )
}

/// Processes holding a listening TCP socket (at start: what the kernel
/// side should already treat as servers). A process whose scan was cut is
/// left out: it becomes a server at its next accept.
pub fn listening_processes() -> HashSet<u32> {
    let mut listening_by_netns: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut servers = HashSet::new();
    let Ok(processes) = procfs::process::all_processes() else {
        return servers;
    };
    for process in processes.flatten() {
        let Ok(tgid) = u32::try_from(process.pid()) else {
            continue;
        };
        let Some(netns) = process
            .namespaces()
            .ok()
            .and_then(|namespaces| namespaces.0.get(std::ffi::OsStr::new("net")).cloned())
        else {
            continue;
        };
        let listening = listening_by_netns
            .entry(netns.identifier)
            .or_insert_with(|| listening_sockets(tgid).found.into_keys().collect());
        if listening.is_empty() {
            continue;
        }
        let mut serves = false;
        visit_socket_inodes(tgid, BOUND, |inode| {
            serves = listening.contains(&inode);
            if serves {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if serves {
            servers.insert(tgid);
        }
    }
    servers
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
    };

    use super::*;

    #[test]
    fn tcp_table_rows() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let mut batch = Batch::new(table.trim_end().to_owned());
        batch.push("   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0");
        batch.push("   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 123999 1 0000000000000000 20 4 30 10 -1");
        let mut sockets = Vec::new();
        let _ = batch.visit(&mut |socket| {
            sockets.push(socket);
            ControlFlow::Continue(())
        });
        assert_eq!(
            sockets,
            vec![
                TcpSocket {
                    local_port: 8080,
                    listening: true,
                    inode: 123456
                },
                TcpSocket {
                    local_port: 8080,
                    listening: false,
                    inode: 123999
                },
            ]
        );
        batch.push("garbage");
        assert!(batch.visit(&mut |_| ControlFlow::Break(())).is_continue());
    }

    #[test]
    fn own_sockets_are_found() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        client.write_all(b"x").expect("write");
        let (accepted, _) = listener.accept().expect("accept");
        let tgid = std::process::id();
        let inode = socket_inode(tgid, listener.as_raw_fd() as u32).expect("inode");
        let accepted_inode = socket_inode(tgid, accepted.as_raw_fd() as u32).expect("inode");

        assert_eq!(listening_sockets(tgid).found.get(&inode), Some(&port));
        assert_eq!(
            listener_port(tgid, inode),
            Scanned {
                found: Some(port),
                complete: true
            }
        );
        // A connection is not among the listening rows, only among all.
        assert_eq!(listener_port(tgid, accepted_inode).found, None);
        assert!(socket_inodes(tgid).found.contains(&inode));
        assert!(holds_socket(tgid, accepted_inode).found);
        let held = tcp_sockets_held(tgid);
        assert!(held.complete);
        assert_eq!(held.found.listening.get(&inode), Some(&port));
        assert!(held.found.connection_ports.contains(&port));
        assert!(listening_processes().contains(&tgid));
    }

    /// A process's descriptors and its namespace's rows are its owner's to
    /// multiply: a scan stops at its bound and says so; a listener-only
    /// scan never reads the connections.
    #[test]
    fn scans_stop_at_their_bounds() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _copies: Vec<_> = (0..8).map(|_| listener.try_clone().expect("dup")).collect();
        let _clients: Vec<_> = (0..8)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect();
        let tgid = std::process::id();
        let small = Bound {
            rows: 4,
            descriptors: 4,
            time: MAX_TIME,
        };
        let mut seen = 0;
        assert!(!visit_socket_inodes(tgid, small, |_| {
            seen += 1;
            ControlFlow::Continue(())
        }));
        assert!(seen <= 4);
        let mut rows = 0;
        assert!(!visit_tcp_rows(tgid, Rows::All, small, |_| {
            rows += 1;
            ControlFlow::Continue(())
        }));
        assert!(rows <= 4);
        // 16 connection rows in this namespace (both ends of 8), one
        // listener of this test's: the listening rows stay within the bound.
        let mut listening_only = Vec::new();
        let complete = visit_tcp_rows(tgid, Rows::Listening, BOUND, |socket| {
            listening_only.push(socket);
            ControlFlow::Continue(())
        });
        assert!(complete);
        assert!(listening_only.iter().all(|socket| socket.listening));
        assert!(
            listening_only
                .iter()
                .any(|socket| socket.local_port == port)
        );
        let zero_time = Bound {
            time: Duration::ZERO,
            ..BOUND
        };
        assert!(!visit_tcp_rows(tgid, Rows::All, zero_time, |_| {
            ControlFlow::Continue(())
        }));
    }

    #[test]
    fn a_cut_scan_is_counted() {
        let counter = IntCounter::new("cut", "cut").expect("counter");
        count_cut_scans_in(counter);
        let before = CUT_SCANS.get().map_or(0, IntCounter::get);
        let scanned = Scanned::new((), false, 1, "test", BOUND);
        assert!(!scanned.complete);
        let _ = Scanned::new((), true, 1, "test", BOUND);
        assert_eq!(CUT_SCANS.get().map_or(0, IntCounter::get), before + 1);
    }
}
