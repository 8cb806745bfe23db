//! Local mode: a server is the topmost process that holds the listening
//! socket (a gunicorn master and its workers are one server, never one per
//! worker) and the port it listens on (two servers on different ports stay
//! apart). Finding it reads `/proc` up the process tree, which other
//! processes size: that runs on a thread of its own, and a connection's
//! exchanges wait in attribution for the answer.

use std::{collections::HashMap, fmt, io, sync::Arc};

use prometheus::IntCounter;
use regex::Regex;

use crate::{
    exchange::{Identity, IdentityLabels, Origin, ServedBy, ServerSlot},
    procfs::{
        self, command_line,
        sockets::{self, socket_inode},
        worker::ScanWorker,
    },
};

/// How far up the process tree a server's root is looked for.
const MAX_ANCESTORS: usize = 32;

/// Lookups waiting for the thread; past it a listener is asked about again
/// at its next connection, and this one's exchanges wait their time.
const MAX_WAITING_LOOKUPS: usize = 256;

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

/// What the thread is asked: the server of a connection of `tgid`.
struct Question {
    tgid: u32,
    /// `None`: picked up mid-stream (its listener is found by port).
    listen_fd: Option<u32>,
    port: Option<u16>,
    slot: Arc<ServerSlot>,
}

/// The thread's answer to a [`Question`].
struct Answer {
    tgid: u32,
    listen_fd: Option<u32>,
    slot: Arc<ServerSlot>,
    server: Option<Server>,
}

/// What a (pid, listening fd) resolved to so far.
#[derive(Debug)]
enum Resolution {
    /// Its server, or `None` when filtered out or the process was gone;
    /// with the start time of the process then under the pid.
    Known {
        identity: Option<Arc<Identity>>,
        process_start: u64,
    },
    /// Asked about; the answer fills the slot.
    Waiting(Arc<ServerSlot>),
}

/// Resolves and caches identities for local mode.
pub struct LocalIdentity {
    filter: ProcessFilter,
    /// By (tgid, listening fd).
    servers: HashMap<(u32, u32), Resolution>,
    identities: HashMap<(String, Option<u16>), Arc<Identity>>,
    worker: ScanWorker<Question, Answer>,
    /// Lookups refused because [`MAX_WAITING_LOOKUPS`] waited.
    refused: IntCounter,
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("filter", &self.filter)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl LocalIdentity {
    /// Starts the lookup thread.
    pub fn new(filter: ProcessFilter) -> io::Result<Self> {
        let worker = ScanWorker::start("local-servers", MAX_WAITING_LOOKUPS, |question| {
            let Question {
                tgid,
                listen_fd,
                port,
                slot,
            } = question;
            let listener = match listen_fd {
                Some(fd) => socket_inode(tgid, fd),
                None => listener_for_connection(tgid, port),
            };
            Answer {
                tgid,
                listen_fd,
                slot,
                server: find_server(tgid, listener, port),
            }
        })?;
        Ok(LocalIdentity {
            filter,
            servers: HashMap::new(),
            identities: HashMap::new(),
            worker,
            refused: IntCounter::new("local_server_lookups", "refused lookups")
                .map_err(io::Error::other)?,
        })
    }

    /// Counts lookups refused past the thread's queue in `counter`.
    pub fn count_refusals_in(&mut self, counter: IntCounter) {
        self.refused = counter;
    }

    /// Whom a new connection is served by: its server once found (waiting
    /// for the thread at a listener's first connection); `None` when the
    /// filters exclude it or its process was gone.
    pub fn resolve(&mut self, origin: &Origin) -> Option<ServedBy> {
        // The kernel's port settles `--port` without a lookup.
        if let Some(port) = origin.port
            && !self.filter.ports.is_empty()
            && !self.filter.ports.contains(&port)
        {
            return None;
        }
        let Some(listen_fd) = origin.listen_fd else {
            // Picked up mid-stream: rare, and not kept.
            return Some(ServedBy::PendingServer(self.ask(origin).0));
        };
        let key = (origin.tgid, listen_fd);
        match self.servers.get(&key) {
            Some(Resolution::Known { identity, .. }) => identity.clone().map(ServedBy::Server),
            Some(Resolution::Waiting(slot)) => Some(ServedBy::PendingServer(slot.clone())),
            None => {
                let (slot, asked) = self.ask(origin);
                if asked {
                    self.servers.insert(key, Resolution::Waiting(slot.clone()));
                }
                Some(ServedBy::PendingServer(slot))
            }
        }
    }

    /// Asks the thread about `origin`'s server; whether it was asked.
    fn ask(&self, origin: &Origin) -> (Arc<ServerSlot>, bool) {
        let slot = Arc::new(ServerSlot::default());
        let asked = self.worker.ask(Question {
            tgid: origin.tgid,
            listen_fd: origin.listen_fd,
            port: origin.port,
            slot: slot.clone(),
        });
        if !asked {
            self.refused.inc();
        }
        (slot, asked)
    }

    /// Takes the thread's answers: each fills its slot and is kept for its
    /// listener's next connections. Whether any came.
    pub fn settle(&mut self) -> bool {
        let answers: Vec<Answer> = self.worker.answers().collect();
        for answer in &answers {
            let identity = answer
                .server
                .as_ref()
                .and_then(|server| self.admit(answer.tgid, server));
            answer.slot.fill(identity.clone());
            let Some(listen_fd) = answer.listen_fd else {
                continue;
            };
            if let Some(resolution) = self.servers.get_mut(&(answer.tgid, listen_fd))
                && matches!(resolution, Resolution::Waiting(slot) if Arc::ptr_eq(slot, &answer.slot))
            {
                *resolution = Resolution::Known {
                    identity,
                    process_start: answer.server.as_ref().map_or(0, |s| s.process_start),
                };
            }
        }
        !answers.is_empty()
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

    /// (pid, listening fd, identity) of the listening sockets whose server
    /// is known.
    pub fn servers(&self) -> Vec<(u32, u32, Option<Arc<Identity>>)> {
        let mut rows: Vec<_> = self
            .servers
            .iter()
            .filter_map(|(&(tgid, fd), resolution)| match resolution {
                Resolution::Known { identity, .. } => Some((tgid, fd, identity.clone())),
                Resolution::Waiting(_) => None,
            })
            .collect();
        rows.sort_by_key(|(tgid, fd, _)| (*tgid, *fd));
        rows
    }

    /// Drops what is cached about processes that exited, or whose pid now
    /// names another process (its exit was not seen: the event was lost).
    /// `runs`: whether a pid still names the process started at a time.
    /// A lookup still waiting stays: its answer replaces it.
    pub fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) {
        self.servers
            .retain(|&(tgid, _), resolution| match resolution {
                Resolution::Known { process_start, .. } => runs(tgid, *process_start),
                Resolution::Waiting(_) => true,
            });
    }
}

/// The server behind a listening socket held by `tgid`: its root is the
/// topmost ancestor that still holds the same socket. `port`: the
/// kernel's, else (no BTF) read from the listening rows.
fn find_server(tgid: u32, listening_inode: Option<u64>, port: Option<u16>) -> Option<Server> {
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
    let port = port
        .or_else(|| listening_inode.and_then(|inode| sockets::listener_port(tgid, inode).found));
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
/// connection's local port (`port`, as the kernel read it).
fn listener_for_connection(tgid: u32, port: Option<u16>) -> Option<u64> {
    let held = sockets::socket_inodes(tgid).found;
    let listening: Vec<(u64, u16)> = sockets::listening_sockets(tgid)
        .found
        .into_iter()
        .filter(|(inode, _)| held.contains(inode))
        .collect();
    if let [(only, _)] = listening[..] {
        return Some(only);
    }
    let port = port?;
    listening
        .iter()
        .find(|(_, listening_port)| *listening_port == port)
        .map(|(inode, _)| *inode)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn local(filter: ProcessFilter) -> LocalIdentity {
        LocalIdentity::new(filter).expect("thread")
    }

    /// What `origin` resolves to once the thread has answered: the first
    /// connection waits; the answer is kept for the next.
    fn resolved(identity: &mut LocalIdentity, origin: &Origin) -> Option<Arc<Identity>> {
        let Some(ServedBy::PendingServer(slot)) = identity.resolve(origin) else {
            panic!("a listener's first connection waits for the thread");
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !identity.settle() {
            assert!(Instant::now() < deadline, "the thread answers");
            std::thread::sleep(Duration::from_millis(1));
        }
        let answer = slot.get().expect("filled").cloned();
        match identity.resolve(origin) {
            Some(ServedBy::Server(kept)) => assert_eq!(Some(kept), answer),
            None => assert_eq!(answer, None),
            other => panic!("kept, not asked again: {other:?}"),
        }
        answer
    }

    #[test]
    fn own_listening_socket_port_and_identity() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        let tgid = std::process::id();

        // Without the kernel's port (no BTF), it is read from /proc.
        let origin = Origin {
            tgid,
            fd: 0,
            listen_fd: Some(fd),
            port: None,
        };
        let found = resolved(&mut local(ProcessFilter::default()), &origin).expect("identity");
        let IdentityLabels::Server { port: label, .. } = &found.labels else {
            panic!("a server's identity: {found:?}");
        };
        assert_eq!(*label, port.to_string());

        let mut other_port = local(ProcessFilter {
            ports: vec![port.wrapping_add(1)],
            ..Default::default()
        });
        assert_eq!(resolved(&mut other_port, &origin), None);
        // With the kernel's port, `--port` needs no lookup.
        let with_port = Origin {
            port: Some(port),
            listen_fd: Some(fd + 1),
            ..origin
        };
        assert_eq!(other_port.resolve(&with_port), None);
        let mut by_pid = local(ProcessFilter {
            pids: vec![tgid],
            ..Default::default()
        });
        assert!(resolved(&mut by_pid, &origin).is_some());
    }

    /// The kernel's port names the server; mid-stream, it also picks the
    /// listener among several the process holds.
    #[test]
    fn the_kernels_port_names_the_server_and_its_listener() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let second = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = second.local_addr().expect("addr").port();
        let tgid = std::process::id();
        let mid_stream = Origin {
            tgid,
            fd: 0,
            listen_fd: None,
            port: Some(port),
        };
        let mut identity = local(ProcessFilter {
            ports: vec![port],
            ..Default::default()
        });
        let Some(ServedBy::PendingServer(slot)) = identity.resolve(&mid_stream) else {
            panic!("mid-stream connections wait for the thread too");
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while slot.get().is_none() {
            assert!(Instant::now() < deadline, "the thread answers");
            identity.settle();
            std::thread::sleep(Duration::from_millis(1));
        }
        let found = slot.get().flatten().expect("admitted by its port");
        assert_eq!(
            found.labels,
            IdentityLabels::Server {
                process: procfs::stat(tgid).expect("stat").name,
                port: port.to_string()
            }
        );
        assert!(
            identity.servers().is_empty(),
            "mid-stream lookups are not kept"
        );
        drop(first);
    }

    /// Past the thread's queue a lookup is refused and counted, and its
    /// listener asked about again at its next connection.
    #[test]
    fn lookups_past_the_queue_are_refused_and_asked_again() {
        let mut identity = local(ProcessFilter::default());
        let origin = |listen_fd| Origin {
            tgid: std::process::id(),
            fd: 0,
            listen_fd: Some(listen_fd),
            port: Some(8000),
        };
        // More than the thread can have taken and queued.
        for listen_fd in 0..(MAX_WAITING_LOOKUPS as u32 * 4) {
            identity.resolve(&origin(1_000_000 + listen_fd));
        }
        assert!(identity.refused.get() > 0);
        let waiting = identity.servers.len() as u64;
        assert_eq!(
            waiting + identity.refused.get(),
            MAX_WAITING_LOOKUPS as u64 * 4
        );
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
            port: Some(8000),
        };
        let mut identity = local(ProcessFilter::default());
        assert!(resolved(&mut identity, &origin).is_some());
        identity.forget_exited(&procfs::runs);
        assert_eq!(identity.servers().len(), 1, "the same process stays");
        for resolution in identity.servers.values_mut() {
            if let Resolution::Known { process_start, .. } = resolution {
                *process_start += 1;
            }
        }
        identity.forget_exited(&procfs::runs);
        assert!(identity.servers().is_empty());
    }
}
