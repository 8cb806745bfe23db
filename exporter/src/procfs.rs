//! What the agent reads about other processes in `/proc`, through the
//! `procfs` crate: a process's name, parent and start time (to find a
//! server's root process and to tell a reused pid apart), its command line,
//! cgroups and sockets, and the TCP tables of its network namespace.
//!
//! Any process may exit between two reads, so every read answers "nothing"
//! rather than an error.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use procfs::{
    ProcessCGroups,
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process, Stat},
};

/// When each process was last scanned, so that one is scanned at most
/// once per interval however many of its connections ask; within a
/// budget of processes (past it, the oldest half is forgotten: a process
/// forgotten early is scanned again sooner, which costs time, never a
/// label).
#[derive(Debug)]
pub struct ScanThrottle {
    last: HashMap<u32, Instant>,
    interval: Duration,
    max_processes: usize,
}

impl ScanThrottle {
    pub fn new(interval: Duration, max_processes: usize) -> Self {
        ScanThrottle {
            last: HashMap::new(),
            interval,
            max_processes,
        }
    }

    /// Whether `tgid` may be scanned now (and, if so, it is noted).
    pub fn may_scan(&mut self, tgid: u32, now: Instant) -> bool {
        if let Some(&at) = self.last.get(&tgid)
            && now.duration_since(at) < self.interval
        {
            return false;
        }
        if self.last.len() >= self.max_processes && !self.last.contains_key(&tgid) {
            let mut times: Vec<Instant> = self.last.values().copied().collect();
            let middle = times.len() / 2;
            let (_, &mut median, _) = times.select_nth_unstable(middle);
            self.last.retain(|_, at| *at > median);
        }
        self.last.insert(tgid, now);
        true
    }
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessStat {
    /// `comm`: the name, which may hold spaces and parentheses.
    pub name: String,
    pub ppid: u32,
    /// Start time in clock ticks since boot: tells a reused pid apart.
    pub start_ticks: u64,
}

impl From<Stat> for ProcessStat {
    fn from(stat: Stat) -> Self {
        ProcessStat {
            name: stat.comm,
            ppid: u32::try_from(stat.ppid).unwrap_or(0),
            start_ticks: stat.starttime,
        }
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

fn process(tgid: u32) -> Option<Process> {
    Process::new(i32::try_from(tgid).ok()?).ok()
}

/// Whether a process with this pid exists (it may be another process than
/// the one once seen under it: compare [`ProcessStat::start_ticks`]).
pub fn is_running(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}

pub fn stat(tgid: u32) -> Option<ProcessStat> {
    process(tgid)?.stat().ok().map(ProcessStat::from)
}

/// The arguments joined by spaces; empty when unreadable.
pub fn command_line(tgid: u32) -> String {
    process(tgid)
        .and_then(|process| process.cmdline().ok())
        .map(|arguments| arguments.join(" "))
        .unwrap_or_default()
}

/// A process's arguments, as it was started (or as it renamed itself).
pub fn command_line_arguments(tgid: u32) -> Option<Vec<String>> {
    process(tgid)?.cmdline().ok()
}

/// A process's environment as it was started (names and values that are
/// not UTF-8 are left out).
pub fn environment(tgid: u32) -> Vec<(String, String)> {
    let Some(environment) = process(tgid).and_then(|process| process.environ().ok()) else {
        return Vec::new();
    };
    environment
        .into_iter()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// A process's working directory, as the kernel names it from this
/// agent's root (see [`root_directory`]).
pub fn working_directory(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.cwd().ok()
}

/// A process's root directory as the kernel names it from this agent's
/// root: `/` for a container's pivoted root, the directory's own path for
/// a chroot. The kernel names the process's cwd and executable the same
/// way, so they are this prefix plus their path inside the root.
pub fn root_directory(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.root().ok()
}

/// The program a process runs (`/proc/<pid>/exe`), named as
/// [`working_directory`] is: for Python, the real interpreter, links
/// resolved.
pub fn executable(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.exe().ok()
}

/// The kernel's per-network-namespace counts, as the metrics stage reads
/// them.
pub struct Network;

impl crate::metrics::NetworkCounts for Network {
    fn namespace(&self, tgid: u32) -> Option<u64> {
        network_namespace(tgid)
    }

    fn own_namespace(&self) -> Option<u64> {
        network_namespace(std::process::id())
    }

    fn listen_overflows(&self, tgid: u32) -> Option<u64> {
        listen_overflows(tgid)
    }
}

/// The network namespace a process is in (its inode number).
pub fn network_namespace(tgid: u32) -> Option<u64> {
    let namespaces = process(tgid)?.namespaces().ok()?;
    namespaces
        .0
        .get(std::ffi::OsStr::new("net"))
        .map(|namespace| namespace.identifier)
}

/// Connections the kernel refused because a listener's accept queue was
/// full, in the network namespace of `tgid`: `TcpExt: ListenOverflows` of
/// `/proc/<tgid>/net/netstat` (a file the procfs crate does not parse:
/// pairs of lines, names then values, per protocol).
pub fn listen_overflows(tgid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/net/netstat")).ok()?;
    listen_overflows_in(&text)
}

fn listen_overflows_in(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let (Some(names), Some(values)) = (
            names.strip_prefix("TcpExt:"),
            values.strip_prefix("TcpExt:"),
        ) {
            return names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "ListenOverflows")
                .and_then(|(_, value)| value.parse().ok());
        }
    }
    None
}

/// The cgroups a process is in, one per hierarchy.
pub fn cgroups(tgid: u32) -> Option<ProcessCGroups> {
    process(tgid)?.cgroups().ok()
}

/// Inode of the socket behind a process's fd.
pub fn socket_inode(tgid: u32, fd: u32) -> Option<u64> {
    let info = process(tgid)?.fd_from_fd(i32::try_from(fd).ok()?).ok()?;
    match info.target {
        FDTarget::Socket(inode) => Some(inode),
        _ => None,
    }
}

/// The local port of the TCP socket behind a process's fd (a listening
/// socket's is the port it serves).
pub fn socket_local_port(tgid: u32, fd: u32) -> Option<u16> {
    tcp_local_port(tgid, socket_inode(tgid, fd)?)
}

/// The local port of the TCP socket `inode` in the network namespace of
/// `tgid`.
pub fn tcp_local_port(tgid: u32, inode: u64) -> Option<u16> {
    tcp_sockets(tgid)
        .into_iter()
        .find(|socket| socket.inode == inode)
        .map(|socket| socket.local_port)
}

/// Inodes of all sockets a process holds.
pub fn socket_inodes(tgid: u32) -> Vec<u64> {
    let Some(fds) = process(tgid).and_then(|process| process.fd().ok()) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|info| match info.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect()
}

/// TCP sockets (v4 and v6) in the network namespace of `tgid`.
pub fn tcp_sockets(tgid: u32) -> Vec<TcpSocket> {
    let Some(process) = process(tgid) else {
        return Vec::new();
    };
    [process.tcp(), process.tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| TcpSocket::from(&entry))
        .collect()
}

/// The TCP sockets a process holds: its listening ones (inode → local
/// port) and the local ports of the others (its connections; an accepted
/// one has its listener's port).
#[derive(Debug, Default)]
pub struct HeldTcpSockets {
    pub listening: HashMap<u64, u16>,
    pub connection_ports: HashSet<u16>,
}

pub fn tcp_sockets_held(tgid: u32) -> HeldTcpSockets {
    let inodes: HashSet<u64> = socket_inodes(tgid).into_iter().collect();
    let mut held = HeldTcpSockets::default();
    for socket in tcp_sockets(tgid) {
        if !inodes.contains(&socket.inode) {
            continue;
        }
        if socket.listening {
            held.listening.insert(socket.inode, socket.local_port);
        } else {
            held.connection_ports.insert(socket.local_port);
        }
    }
    held
}

/// Inodes of listening TCP sockets in the network namespace of `tgid`.
pub fn listening_inodes(tgid: u32) -> HashSet<u64> {
    tcp_sockets(tgid)
        .into_iter()
        .filter(|socket| socket.listening)
        .map(|socket| socket.inode)
        .collect()
}

/// Whether a filesystem of this type is mounted in the agent's namespace.
pub fn is_mounted(filesystem_type: &str) -> bool {
    procfs::mounts()
        .map(|mounts| {
            mounts
                .iter()
                .any(|mount| mount.fs_vfstype == filesystem_type)
        })
        .unwrap_or(false)
}

/// Processes holding a listening TCP socket.
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
            .or_insert_with(|| listening_inodes(tgid));
        if !listening.is_empty()
            && socket_inodes(tgid)
                .iter()
                .any(|inode| listening.contains(inode))
        {
            servers.insert(tgid);
        }
    }
    servers
}

#[cfg(test)]
mod tests {
    use procfs::{FromRead as _, FromReadSI as _, net::TcpNetEntries};

    use super::*;

    #[test]
    fn listen_overflows_from_netstat() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(listen_overflows_in(netstat), Some(7));
        assert_eq!(listen_overflows_in("IpExt: InNoRoutes\nIpExt: 0\n"), None);
        assert_eq!(listen_overflows_in("TcpExt: ListenOverflows\n"), None);
    }

    #[test]
    fn stat_with_spaces_and_parentheses_in_comm() {
        let text = "4242 (gunicorn: (worker) x) S 4200 4100 4100 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 1 1 1 1 1 1 1 0";
        let stat = Stat::from_read(text.as_bytes()).expect("parses");
        assert_eq!(
            ProcessStat::from(stat),
            ProcessStat {
                name: "gunicorn: (worker) x".to_owned(),
                ppid: 4200,
                start_ticks: 987654,
            }
        );
        let own = super::stat(std::process::id()).expect("own stat");
        assert!(own.start_ticks > 0);
        assert!(Stat::from_read("garbage".as_bytes()).is_err());
    }

    #[test]
    fn tcp_table_rows() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 123999 1 0000000000000000 20 4 30 10 -1\n";
        let entries = TcpNetEntries::from_read(table.as_bytes(), procfs::current_system_info())
            .expect("parses");
        let sockets: Vec<TcpSocket> = entries.0.iter().map(TcpSocket::from).collect();
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
    }

    #[test]
    fn own_listening_socket_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        let tgid = std::process::id();
        let inode = socket_inode(tgid, fd).expect("inode");
        assert!(listening_inodes(tgid).contains(&inode));
        assert!(socket_inodes(tgid).contains(&inode));
        assert!(listening_processes().contains(&tgid));
        assert!(!command_line(tgid).is_empty());
    }

    /// However many connections ask, a process is scanned once per
    /// interval; the set of processes stays within its budget.
    #[test]
    fn a_process_is_scanned_once_per_interval() {
        let mut throttle = ScanThrottle::new(Duration::from_secs(1), 4);
        let start = Instant::now();
        assert!(throttle.may_scan(7, start));
        assert!(!throttle.may_scan(7, start + Duration::from_millis(10)));
        assert!(throttle.may_scan(8, start));
        assert!(throttle.may_scan(7, start + Duration::from_secs(1)));
        for (n, tgid) in (100..200).enumerate() {
            assert!(throttle.may_scan(tgid, start + Duration::from_millis(n as u64)));
            assert!(throttle.last.len() <= 4);
        }
    }
}
