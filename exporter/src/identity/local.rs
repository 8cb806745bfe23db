//! Local mode: a server is the topmost process that holds the listening
//! socket (a gunicorn master and its workers are one server, never one per
//! worker) and the port it listens on (two servers on different ports stay
//! apart).

use std::{collections::HashMap, sync::Arc};

use regex::Regex;

use crate::{
    exchange::{Identity, IdentityLabels, Origin},
    procfs::{
        self, command_line,
        sockets::{self, socket_inode},
    },
};

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
    /// Start time of the process that accepted (it tells a reused pid).
    process_start: u64,
    root_pid: u32,
    root_name: String,
    port: Option<u16>,
    command_line: String,
}

/// What a (pid, listening fd) resolved to, and the start time of the
/// process then under the pid.
#[derive(Debug)]
struct Accepted {
    identity: Option<Arc<Identity>>,
    process_start: u64,
}

/// Resolves and caches identities for local mode.
#[derive(Debug, Default)]
pub struct LocalIdentity {
    filter: ProcessFilter,
    /// What accepted connections resolve to, by (tgid, listening fd):
    /// their server, or `None` when filtered out or the process was gone;
    /// with the process's start time, so that a reused pid is told apart.
    servers: HashMap<(u32, u32), Accepted>,
    identities: HashMap<(String, Option<u16>), Arc<Identity>>,
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
    pub fn resolve(&mut self, origin: &Origin) -> Option<Arc<Identity>> {
        let Some(listen_fd) = origin.listen_fd else {
            // Picked up mid-stream.
            let listener = listener_for_connection(origin.tgid, origin.fd);
            let server = find_server(origin.tgid, listener)?;
            return self.admit(origin.tgid, &server);
        };
        let key = (origin.tgid, listen_fd);
        if let Some(cached) = self.servers.get(&key) {
            return cached.identity.clone();
        }
        let (identity, process_start) =
            match find_server(origin.tgid, socket_inode(origin.tgid, listen_fd)) {
                Some(server) => (self.admit(origin.tgid, &server), server.process_start),
                None => (None, 0),
            };
        self.servers.insert(
            key,
            Accepted {
                identity: identity.clone(),
                process_start,
            },
        );
        identity
    }

    /// Applies the filters to a server and returns its identity, shared by
    /// every process of the server.
    fn admit(&mut self, tgid: u32, server: &Server) -> Option<Arc<Identity>> {
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
        let identity = self
            .identities
            .entry((server.root_name.clone(), server.port))
            .or_insert_with(|| {
                let port = server
                    .port
                    .map_or_else(|| "unknown".to_owned(), |port| port.to_string());
                Arc::new(Identity::new(IdentityLabels::Server {
                    process: server.root_name.clone(),
                    port,
                }))
            });
        Some(identity.clone())
    }

    /// (pid, listening fd, identity) of the listening sockets seen.
    pub fn servers(&self) -> Vec<(u32, u32, Option<Arc<Identity>>)> {
        let mut rows: Vec<_> = self
            .servers
            .iter()
            .map(|(&(tgid, fd), accepted)| (tgid, fd, accepted.identity.clone()))
            .collect();
        rows.sort_by_key(|(tgid, fd, _)| (*tgid, *fd));
        rows
    }

    /// Drops what is cached about processes that exited, or whose pid now
    /// names another process (its exit was not seen: the event was lost).
    /// `runs`: whether a pid still names the process started at a time.
    pub fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) {
        self.servers
            .retain(|&(tgid, _), accepted| runs(tgid, accepted.process_start));
    }
}

/// The server behind a listening socket held by `tgid`: its root is the
/// topmost ancestor that still holds the same socket.
fn find_server(tgid: u32, listening_inode: Option<u64>) -> Option<Server> {
    let mut root = tgid;
    let mut root_stat = procfs::stat(tgid)?;
    let process_start = root_stat.start_ticks;
    if let Some(inode) = listening_inode {
        let started = std::time::Instant::now();
        for _ in 0..MAX_ANCESTORS {
            // The walk as a whole stays within one scan's time.
            if started.elapsed() >= sockets::MAX_TIME {
                break;
            }
            let parent = root_stat.ppid;
            // A parent whose scan was cut is not taken for the root: the
            // server is named after the process that accepted.
            if parent <= 1 || !sockets::holds_socket(parent, inode).found {
                break;
            }
            let Some(parent_stat) = procfs::stat(parent) else {
                break;
            };
            root = parent;
            root_stat = parent_stat;
        }
    }
    let port = listening_inode.and_then(|inode| sockets::listener_port(tgid, inode).found);
    Some(Server {
        process_start,
        root_pid: root,
        root_name: root_stat.name,
        port,
        command_line: command_line(root),
    })
}

/// The listening socket a connection picked up mid-stream came from: the
/// only one its process holds or, when it holds several, the one on the
/// connection's local port (unknown once the connection is closed).
fn listener_for_connection(tgid: u32, fd: u32) -> Option<u64> {
    let held = sockets::socket_inodes(tgid).found;
    let listening: Vec<(u64, u16)> = sockets::listening_sockets(tgid)
        .found
        .into_iter()
        .filter(|(inode, _)| held.contains(inode))
        .collect();
    if let [(only, _)] = listening[..] {
        return Some(only);
    }
    let port = sockets::connection_port(tgid, socket_inode(tgid, fd)?).found?;
    listening
        .iter()
        .find(|(_, listening_port)| *listening_port == port)
        .map(|(inode, _)| *inode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listening_socket_port_and_identity() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        let tgid = std::process::id();

        let origin = Origin {
            tgid,
            fd: 0,
            listen_fd: Some(fd),
        };
        let mut identity = LocalIdentity::new(ProcessFilter::default());
        let resolved = identity.resolve(&origin).expect("identity");
        let IdentityLabels::Server { port: label, .. } = &resolved.labels else {
            panic!("a server's identity: {resolved:?}");
        };
        assert_eq!(*label, port.to_string());

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

    /// A cached identity whose pid now runs under another start time is
    /// another process's: the reap drops it (when the exit went unseen).
    #[test]
    fn a_pid_under_another_start_time_is_forgotten() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        let tgid = std::process::id();
        let origin = Origin {
            tgid,
            fd: 0,
            listen_fd: Some(fd),
        };
        let mut identity = LocalIdentity::new(ProcessFilter::default());
        assert!(identity.resolve(&origin).is_some());
        identity.forget_exited(&procfs::runs);
        assert_eq!(identity.servers().len(), 1, "the same process stays");
        for accepted in identity.servers.values_mut() {
            accepted.process_start += 1;
        }
        identity.forget_exited(&procfs::runs);
        assert!(identity.servers().is_empty());
    }
}
