//! What all connections together may hold: heads not complete yet and
//! the targets of requests waiting for their responses, each within a
//! node-wide byte budget, the oldest given up first.

use std::collections::BTreeSet;

use super::{Connection, StreamCounters};

/// Bytes all connections together may hold of heads not complete yet;
/// beyond it the oldest are given up first.
pub const MAX_PARTIAL_HEAD_BYTES: usize = 16 * 1024 * 1024;

/// Bytes all connections together may hold of the targets of requests
/// waiting for their responses; past it the connection that went over
/// gives up its oldest.
pub const MAX_PENDING_TARGET_BYTES: usize = 16 * 1024 * 1024;

/// Connections holding partial heads, oldest first, and their bytes.
#[derive(Debug, Default)]
pub(super) struct PartialHeads {
    pub(super) oldest: BTreeSet<(u64, (u32, u32))>,
    pub(super) bytes: usize,
}

impl PartialHeads {
    /// Brings the index up to date with what `connection` holds now.
    pub(super) fn account(&mut self, key: (u32, u32), connection: &mut Connection) {
        let now = connection.http.partial_heads();
        if now == connection.partial {
            return;
        }
        if let Some((bytes, since)) = connection.partial.take() {
            self.oldest.remove(&(since, key));
            self.bytes -= bytes;
        }
        if let Some((bytes, since)) = now {
            self.oldest.insert((since, key));
            self.bytes += bytes;
        }
        connection.partial = now;
    }

    pub(super) fn forget(&mut self, key: (u32, u32), connection: &Connection) {
        if let Some((bytes, since)) = connection.partial {
            self.oldest.remove(&(since, key));
            self.bytes -= bytes;
        }
    }
}

/// The bytes of the waiting requests' targets, over all connections: the
/// sum of each connection's share when it was last counted.
#[derive(Debug, Default)]
pub(super) struct PendingTargets {
    pub(super) bytes: usize,
}

impl PendingTargets {
    pub(super) fn account(&mut self, connection: &mut Connection) {
        let now = connection.http.pending_target_bytes();
        self.bytes = self.bytes - connection.pending_target_bytes + now;
        connection.pending_target_bytes = now;
    }

    pub(super) fn forget(&mut self, connection: &Connection) {
        self.bytes -= connection.pending_target_bytes;
    }

    /// Past `max`, `connection` (the one that went over) gives up its
    /// oldest waiting requests, counted, until the rest fit or it holds
    /// none.
    pub(super) fn enforce(
        &mut self,
        max: usize,
        connection: &mut Connection,
        counters: &StreamCounters,
    ) {
        while self.bytes > max && connection.http.abandon_oldest_request(&counters.http) {
            counters.pending_target_budget.inc();
            self.account(connection);
        }
    }
}

/// What all connections together may hold.
#[derive(Clone, Copy, Debug)]
pub struct HeldBytes {
    /// Heads not complete yet.
    pub partial_heads: usize,
    /// Targets of requests waiting for their responses.
    pub pending_targets: usize,
}

impl Default for HeldBytes {
    fn default() -> Self {
        HeldBytes {
            partial_heads: MAX_PARTIAL_HEAD_BYTES,
            pending_targets: MAX_PENDING_TARGET_BYTES,
        }
    }
}
