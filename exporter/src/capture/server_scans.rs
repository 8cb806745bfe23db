//! Whether a process has anything left to follow once one of its listening
//! sockets is ignored: a look at its sockets in `/proc`, on a thread of its
//! own, since the process and its network namespace decide how long the
//! look takes.

use std::{collections::HashSet, time::Instant};

use exporter_common::ConnKey;

use crate::procfs::{
    sockets::{self, HeldTcpSockets},
    throttle::ScanThrottle,
    worker::ScanWorker,
};

/// Questions waiting for the thread; past it a verdict's scan is skipped
/// (the process stays followed: time, never an exchange).
const QUEUE: usize = 1024;

/// A listener just ignored, and every listening fd of its process ignored
/// with it when asked.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ServerScan {
    pub listener: ConnKey,
    pub ignored_fds: Vec<u32>,
}

/// What the look found.
#[derive(Debug)]
pub(super) struct ServerScanned {
    pub scan: ServerScan,
    /// Nothing the process holds is followed: the kernel may stop at its
    /// pid. `false` also when the look was cut at its bound.
    pub nothing_to_follow: bool,
}

pub(super) struct ServerScans {
    worker: ScanWorker<ServerScan, ServerScanned>,
    /// Listeners past the remembered budget are judged at each of their
    /// connections: their processes are looked at once a second at most.
    throttle: ScanThrottle,
}

impl ServerScans {
    pub(super) fn start(throttle: ScanThrottle) -> std::io::Result<Self> {
        Ok(ServerScans {
            worker: ScanWorker::start("server-scans", QUEUE, |scan| {
                let nothing_to_follow = nothing_to_follow(&scan);
                ServerScanned {
                    scan,
                    nothing_to_follow,
                }
            })?,
            throttle,
        })
    }

    /// Asks about `scan.listener`'s process; `remembered`: its verdict is
    /// remembered (else the throttle decides).
    pub(super) fn ask(&mut self, scan: ServerScan, remembered: bool) {
        if remembered || self.throttle.may_scan(scan.listener.tgid, Instant::now()) {
            let _ = self.worker.ask(scan);
        }
    }

    /// The answers ready now.
    pub(super) fn answers(&self) -> impl Iterator<Item = ServerScanned> + '_ {
        self.worker.answers()
    }
}

fn nothing_to_follow(scan: &ServerScan) -> bool {
    let tgid = scan.listener.tgid;
    let held = sockets::tcp_sockets_held(tgid);
    // A look cut at its bound cannot tell.
    if !held.complete {
        return false;
    }
    let ignored: HashSet<u64> = scan
        .ignored_fds
        .iter()
        .filter_map(|&fd| sockets::socket_inode(tgid, fd))
        .collect();
    holds_nothing_to_follow(&held.found, &ignored)
}

/// A process holds nothing to follow when each listening socket it holds
/// is ignored, or holds no connection. A listener not judged yet has
/// nothing to follow now when the process holds no connection on its port
/// (its next accept makes the process a server again), or when an ignored
/// listener shares that port (Redis's 127.0.0.1 and ::1: one protocol, and
/// connections by port cannot tell the two apart).
fn holds_nothing_to_follow(held: &HeldTcpSockets, ignored: &HashSet<u64>) -> bool {
    let ignored_ports: HashSet<u16> = held
        .listening
        .iter()
        .filter(|(inode, _)| ignored.contains(inode))
        .map(|(_, port)| *port)
        .collect();
    !held.listening.is_empty()
        && held.listening.iter().all(|(inode, port)| {
            ignored.contains(inode)
                || ignored_ports.contains(port)
                || !held.connection_ports.contains(port)
        })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::TcpListener, os::fd::AsRawFd as _, time::Duration};

    use super::*;

    #[test]
    fn what_a_process_holds_decides() {
        let held = |listening: &[(u64, u16)], connections: &[u16]| HeldTcpSockets {
            listening: listening.iter().copied().collect::<HashMap<_, _>>(),
            connection_ports: connections.iter().copied().collect(),
        };
        let ignored = |inodes: &[u64]| inodes.iter().copied().collect::<HashSet<_>>();
        // Its only listener ignored.
        assert!(holds_nothing_to_follow(
            &held(&[(1, 80)], &[80]),
            &ignored(&[1])
        ));
        // Another listener with a connection on it: followed.
        assert!(!holds_nothing_to_follow(
            &held(&[(1, 80), (2, 81)], &[81]),
            &ignored(&[1])
        ));
        // Another listener without connections: nothing to follow now.
        assert!(holds_nothing_to_follow(
            &held(&[(1, 80), (2, 81)], &[80]),
            &ignored(&[1])
        ));
        // The same port as an ignored one (v4 and v6).
        assert!(holds_nothing_to_follow(
            &held(&[(1, 6379), (2, 6379)], &[6379]),
            &ignored(&[1])
        ));
        // No listener at all: not a server the look can judge.
        assert!(!holds_nothing_to_follow(&held(&[], &[]), &ignored(&[])));
    }

    /// The look runs on its thread, against this process's own sockets.
    #[test]
    fn a_process_is_looked_at_on_the_scanning_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = other.local_addr().expect("addr").port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_accepted, _) = other.accept().expect("accept");
        let mut scans =
            ServerScans::start(ScanThrottle::new(Duration::from_secs(1), 16)).expect("thread");
        let key = |fd: i32| ConnKey {
            tgid: std::process::id(),
            fd: fd as u32,
        };
        let ask = |scans: &mut ServerScans, fds: Vec<i32>| {
            scans.ask(
                ServerScan {
                    listener: key(fds[0]),
                    ignored_fds: fds.iter().map(|&fd| fd as u32).collect(),
                },
                true,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(answer) = scans.answers().next() {
                    return answer.nothing_to_follow;
                }
                assert!(Instant::now() < deadline, "no answer");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // `other` holds a connection and is not ignored: something to
        // follow. (Other tests of this process hold listeners too, so the
        // opposite is asserted only on plain data, above.)
        assert!(!ask(&mut scans, vec![listener.as_raw_fd()]));
    }
}
