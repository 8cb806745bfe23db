//! Local mode: a server is the topmost process that holds the listening
//! socket (a gunicorn master and its workers are one server, never one per
//! worker) and the port it listens on (two servers on different ports stay
//! apart).

use std::{
    collections::{HashMap, HashSet},
    fs,
    sync::Arc,
};

use regex::Regex;

use super::{IdentityLabels, Origin};

/// Label names local mode adds to every `flask_*` series.
pub const LOCAL_LABELS: [&str; 2] = ["process", "port"];

/// How far up the process tree a server's root is looked for.
const MAX_ANCESTORS: usize = 32;

/// Which servers to watch; empty lists mean all.
#[derive(Clone, Debug, Default)]
pub struct ProcessFilter {
    /// Match the serving process or its server's root process.
    pub pids: Vec<u32>,
    /// Matched against the command line (arguments joined by spaces).
    pub command: Option<Regex>,
    pub ports: Vec<u16>,
}

/// A listening socket and the process tree serving it.
#[derive(Debug)]
struct Server {
    root_pid: u32,
    root_name: String,
    port: Option<u16>,
    command_line: String,
}

/// Resolves and caches identities for local mode.
#[derive(Debug, Default)]
pub struct LocalIdentity {
    filter: ProcessFilter,
    /// What accepted connections resolve to, by (tgid, listening fd):
    /// their labels, or `None` when filtered out or the process was gone.
    servers: HashMap<(u32, u32), Option<IdentityLabels>>,
    labels: HashMap<(String, Option<u16>), IdentityLabels>,
}

impl LocalIdentity {
    pub fn new(filter: ProcessFilter) -> Self {
        LocalIdentity {
            filter,
            ..Default::default()
        }
    }

    /// The identity of a new connection, or `None` when filters exclude it or
    /// its process is already gone.
    pub fn resolve(&mut self, origin: &Origin) -> Option<IdentityLabels> {
        let Some(listen_fd) = origin.listen_fd else {
            // Picked up mid-stream: find the listener by the connection's
            // port or, when the server already closed the connection, as the
            // only listening socket the process holds.
            let listener = listener_for_connection(origin.tgid, origin.fd)
                .or_else(|| sole_listener(origin.tgid));
            let server = find_server(origin.tgid, listener)?;
            return self.admit(origin.tgid, &server);
        };
        let key = (origin.tgid, listen_fd);
        if let Some(cached) = self.servers.get(&key) {
            return cached.clone();
        }
        let admitted = find_server(origin.tgid, socket_inode(origin.tgid, listen_fd))
            .and_then(|server| self.admit(origin.tgid, &server));
        self.servers.insert(key, admitted.clone());
        admitted
    }

    /// Applies the filters to a server and returns its labels, shared by
    /// every process of the server.
    fn admit(&mut self, tgid: u32, server: &Server) -> Option<IdentityLabels> {
        if !self.filter.pids.is_empty()
            && !self
                .filter
                .pids
                .iter()
                .any(|&pid| pid == tgid || pid == server.root_pid)
        {
            return None;
        }
        if let Some(command) = &self.filter.command
            && !command.is_match(&server.command_line)
        {
            return None;
        }
        if !self.filter.ports.is_empty()
            && !server
                .port
                .is_some_and(|port| self.filter.ports.contains(&port))
        {
            return None;
        }
        let labels = self
            .labels
            .entry((server.root_name.clone(), server.port))
            .or_insert_with(|| {
                let port = server
                    .port
                    .map_or_else(|| "unknown".to_owned(), |port| port.to_string());
                Arc::from(vec![server.root_name.clone(), port])
            });
        Some(labels.clone())
    }

    /// (pid, listening fd, labels) of the servers seen, for `/debug/pods`.
    pub fn servers(&self) -> Vec<(u32, u32, Option<IdentityLabels>)> {
        let mut rows: Vec<_> = self
            .servers
            .iter()
            .map(|(&(tgid, fd), labels)| (tgid, fd, labels.clone()))
            .collect();
        rows.sort_by_key(|(tgid, fd, _)| (*tgid, *fd));
        rows
    }

    /// Drops what is cached about processes that exited (their pids may be
    /// reused).
    pub fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool) {
        self.servers.retain(|&(tgid, _), _| alive(tgid));
    }
}

/// The server behind a listening socket held by `tgid`: its root is the
/// topmost ancestor that still holds the same socket.
fn find_server(tgid: u32, listening_inode: Option<u64>) -> Option<Server> {
    let mut root = tgid;
    let mut root_stat = read_stat(tgid)?;
    if let Some(inode) = listening_inode {
        for _ in 0..MAX_ANCESTORS {
            let parent = root_stat.ppid;
            if parent <= 1 || !socket_inodes(parent).contains(&inode) {
                break;
            }
            let Some(parent_stat) = read_stat(parent) else {
                break;
            };
            root = parent;
            root_stat = parent_stat;
        }
    }
    let port = listening_inode.and_then(|inode| {
        tcp_rows(tgid)
            .into_iter()
            .find(|row| row.inode == inode)
            .map(|row| row.local_port)
    });
    Some(Server {
        root_pid: root,
        root_name: root_stat.name,
        port,
        command_line: command_line(root),
    })
}

/// The listening socket in `tgid`'s network namespace on the local port of
/// the connection behind `fd`.
fn listener_for_connection(tgid: u32, fd: u32) -> Option<u64> {
    let inode = socket_inode(tgid, fd)?;
    let rows = tcp_rows(tgid);
    let port = rows.iter().find(|row| row.inode == inode)?.local_port;
    let held: HashSet<u64> = socket_inodes(tgid).into_iter().collect();
    rows.iter()
        .find(|row| row.state == TCP_LISTEN && row.local_port == port && held.contains(&row.inode))
        .map(|row| row.inode)
}

/// The listening socket a process holds, if it holds exactly one.
fn sole_listener(tgid: u32) -> Option<u64> {
    let listening = listening_inodes(tgid);
    let mut held = socket_inodes(tgid)
        .into_iter()
        .filter(|inode| listening.contains(inode));
    let first = held.next()?;
    held.next().is_none().then_some(first)
}

fn command_line(tgid: u32) -> String {
    fs::read(format!("/proc/{tgid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

#[derive(Debug, PartialEq, Eq)]
pub struct Stat {
    pub name: String,
    pub ppid: u32,
    /// Start time in clock ticks since boot: tells a reused pid apart.
    pub start_ticks: u64,
}

pub fn read_stat(tgid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?)
}

/// `/proc/<pid>/stat`: "pid (comm) state ppid ... starttime ..."; comm may
/// hold spaces and parentheses, so split at the last ')'.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Field 22 of the whole line; the slice starts at field 3 (state).
    Some(Stat {
        name,
        ppid: fields.get(1)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Inode of the socket behind a process's fd.
fn socket_inode(tgid: u32, fd: u32) -> Option<u64> {
    let target = fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
    let text = target.to_str()?;
    text.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Inodes of all sockets a process holds.
pub fn socket_inodes(tgid: u32) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{tgid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|fd| socket_inode(tgid, fd))
        .collect()
}

/// One row of /proc/net/tcp{,6}: local port, state, inode.
#[derive(Debug, PartialEq, Eq)]
pub struct TcpRow {
    pub local_port: u16,
    pub state: u8,
    pub inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;

pub fn parse_tcp_table(table: &str) -> Vec<TcpRow> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let port_hex = local.rsplit(':').next()?;
            Some(TcpRow {
                local_port: u16::from_str_radix(port_hex, 16).ok()?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn tcp_rows(tgid: u32) -> Vec<TcpRow> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(format!("/proc/{tgid}/net/{table}")).ok())
        .flat_map(|text| parse_tcp_table(&text))
        .collect()
}

/// Inodes of listening TCP sockets in the network namespace of `tgid`.
pub fn listening_inodes(tgid: u32) -> HashSet<u64> {
    tcp_rows(tgid)
        .into_iter()
        .filter(|row| row.state == TCP_LISTEN)
        .map(|row| row.inode)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_comm() {
        let stat = "4242 (gunicorn: (worker) x) S 4200 4100 4100 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 900";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                name: "gunicorn: (worker) x".to_owned(),
                ppid: 4200,
                start_ticks: 987654,
            })
        );
        let own = read_stat(std::process::id()).expect("own stat");
        assert!(own.start_ticks > 0);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn tcp_table_rows() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 123999 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            parse_tcp_table(table),
            vec![
                TcpRow {
                    local_port: 8080,
                    state: 0x0A,
                    inode: 123456
                },
                TcpRow {
                    local_port: 8080,
                    state: 0x01,
                    inode: 123999
                },
            ]
        );
    }

    #[test]
    fn own_listening_socket_port_and_identity() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        let tgid = std::process::id();
        assert!(listening_inodes(tgid).contains(&socket_inode(tgid, fd).expect("inode")));

        let origin = Origin {
            tgid,
            fd: 0,
            listen_fd: Some(fd),
        };
        let mut identity = LocalIdentity::new(ProcessFilter::default());
        let labels = identity.resolve(&origin).expect("identity");
        assert_eq!(labels[1], port.to_string());

        let mut other_port = LocalIdentity::new(ProcessFilter {
            ports: vec![port.wrapping_add(1)],
            ..Default::default()
        });
        assert_eq!(other_port.resolve(&origin), None);
        let mut by_pid = LocalIdentity::new(ProcessFilter {
            pids: vec![tgid],
            ..Default::default()
        });
        assert!(by_pid.resolve(&origin).is_some());
    }
}
