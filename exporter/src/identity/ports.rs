//! The port a connection's server listens on: the `server_port` label of
//! OpenTelemetry's names. Read from `/proc` once per (process, listening
//! fd), since a short connection may be gone by the time its first event
//! is handled while its listener stays.

use std::collections::HashMap;

use prometheus::IntCounter;

use crate::{exchange::Origin, procfs};

/// Listeners whose port is kept: processes come from pods, so the map is
/// bounded; past it ports are read each time, never guessed.
const MAX_LISTENERS: usize = 4096;

#[derive(Debug)]
pub struct ServerPorts {
    /// By (process, listening fd); `None`: it could not be read.
    ports: HashMap<(u32, u32), Option<u16>>,
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
        self.port_with(origin, &procfs::socket_local_port)
    }

    fn port_with(
        &mut self,
        origin: &Origin,
        read: &dyn Fn(u32, u32) -> Option<u16>,
    ) -> Option<u16> {
        // Picked up mid-stream: the connection's own local port is its
        // listener's (read while it is still open).
        let Some(listen_fd) = origin.listen_fd else {
            return read(origin.tgid, origin.fd);
        };
        let key = (origin.tgid, listen_fd);
        if let Some(&port) = self.ports.get(&key) {
            return port;
        }
        let port = read(origin.tgid, listen_fd);
        if self.ports.len() < MAX_LISTENERS {
            self.ports.insert(key, port);
        } else {
            self.budget.inc();
        }
        port
    }

    /// Forgets the listeners of processes that exited.
    pub fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool) {
        self.ports.retain(|&(tgid, _), _| alive(tgid));
    }
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
        let origin = |tgid, listen_fd| Origin {
            tgid,
            fd: 100,
            listen_fd,
        };
        assert_eq!(ports.port_with(&origin(1, Some(3)), &read), Some(4));
        assert_eq!(ports.port_with(&origin(1, Some(3)), &read), Some(4));
        assert_eq!(reads.get(), 1, "kept");
        // Mid-stream: the connection's own port, read each time.
        assert_eq!(ports.port_with(&origin(1, None), &read), Some(101));
        assert_eq!(reads.get(), 2);
        for tgid in 0..MAX_LISTENERS as u32 + 10 {
            assert_eq!(
                ports.port_with(&origin(tgid + 10, Some(1)), &read),
                Some((tgid + 11) as u16),
                "past the budget still read, never guessed"
            );
        }
        assert_eq!(ports.ports.len(), MAX_LISTENERS);
        assert_eq!(budget.get(), 11);
        ports.forget_exited(&|tgid| tgid != 1);
        assert!(!ports.ports.contains_key(&(1, 3)));
    }
}
