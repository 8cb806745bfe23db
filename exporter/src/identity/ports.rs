//! The port a connection's server listens on: the `server_port` label of
//! OpenTelemetry's names. Read from `/proc` once per (process, listening
//! fd), since a short connection may be gone by the time its first event
//! is handled while its listener stays; kept with the process's start
//! time, so that a reused pid is read anew.

use std::collections::HashMap;

use prometheus::IntCounter;

use crate::{
    exchange::Origin,
    procfs::{self, sockets},
};

/// Listeners whose port is kept: processes come from pods, so the map is
/// bounded; past it ports are read each time, never guessed.
const MAX_LISTENERS: usize = 4096;

#[derive(Debug)]
pub struct ServerPorts {
    /// By (process, listening fd): the port (`None`: it could not be
    /// read) and the process's start time.
    ports: HashMap<(u32, u32), (Option<u16>, u64)>,
    budget: IntCounter,
}

impl ServerPorts {
    /// `budget` counts lookups past [`MAX_LISTENERS`] (not kept).
    pub fn new(budget: IntCounter) -> Self {
        ServerPorts {
            ports: HashMap::new(),
            budget,
        }
    }

    /// The port the connection of `origin` was accepted on.
    pub fn port(&mut self, origin: &Origin) -> Option<u16> {
        self.port_with(origin, &read_port, &|tgid| {
            procfs::stat(tgid).map_or(0, |stat| stat.start_ticks)
        })
    }

    fn port_with(
        &mut self,
        origin: &Origin,
        read: &dyn Fn(u32, u32) -> Option<u16>,
        process_start: &dyn Fn(u32) -> u64,
    ) -> Option<u16> {
        // Picked up mid-stream: the connection's own local port is its
        // listener's (read while it is still open).
        let Some(listen_fd) = origin.listen_fd else {
            return read(origin.tgid, origin.fd);
        };
        let key = (origin.tgid, listen_fd);
        if let Some(&(port, _)) = self.ports.get(&key) {
            return port;
        }
        let port = read(origin.tgid, listen_fd);
        if self.ports.len() < MAX_LISTENERS {
            self.ports.insert(key, (port, process_start(origin.tgid)));
        } else {
            self.budget.inc();
        }
        port
    }

    /// Forgets the listeners of processes that exited or whose pid names
    /// another process now (`runs`: whether a pid still names the process
    /// started at a time).
    pub fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) {
        self.ports
            .retain(|&(tgid, _), &mut (_, start)| runs(tgid, start));
    }
}

/// The local port of the TCP socket behind a process's fd: a listener's
/// among the listening rows; a connection's (picked up mid-stream) among
/// all, within their bound.
fn read_port(tgid: u32, fd: u32) -> Option<u16> {
    let inode = sockets::socket_inode(tgid, fd)?;
    sockets::listener_port(tgid, inode)
        .found
        .or_else(|| sockets::connection_port(tgid, inode).found)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn ports_are_read_once_per_listener_within_their_budget() {
        let budget = IntCounter::new("b", "b").expect("counter");
        let mut ports = ServerPorts::new(budget.clone());
        let reads = Cell::new(0);
        let read = |tgid: u32, fd: u32| {
            reads.set(reads.get() + 1);
            Some((tgid + fd) as u16)
        };
        let start = |_| 7;
        let origin = |tgid, listen_fd| Origin {
            tgid,
            fd: 100,
            listen_fd,
        };
        assert_eq!(ports.port_with(&origin(1, Some(3)), &read, &start), Some(4));
        assert_eq!(ports.port_with(&origin(1, Some(3)), &read, &start), Some(4));
        assert_eq!(reads.get(), 1, "kept");
        // Mid-stream: the connection's own port, read each time.
        assert_eq!(ports.port_with(&origin(1, None), &read, &start), Some(101));
        assert_eq!(reads.get(), 2);
        for tgid in 0..MAX_LISTENERS as u32 + 10 {
            assert_eq!(
                ports.port_with(&origin(tgid + 10, Some(1)), &read, &start),
                Some((tgid + 11) as u16),
                "past the budget still read, never guessed"
            );
        }
        assert_eq!(ports.ports.len(), MAX_LISTENERS);
        assert_eq!(budget.get(), 11);
        // Kept while the pid names the process started then.
        ports.forget_exited(&|tgid, start| tgid != 1 || start == 7);
        assert!(ports.ports.contains_key(&(1, 3)));
        ports.forget_exited(&|tgid, start| tgid != 1 || start == 8);
        assert!(!ports.ports.contains_key(&(1, 3)));
    }
}
