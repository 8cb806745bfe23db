//! Whether the agent works: readiness (programs attached, events flowing,
//! and in Kubernetes mode the node's pods listed once) and the monotonic
//! clock the kernel stamps events with. Written by the pipeline and the pod
//! watch, read by `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A heartbeat older than this makes the agent unready.
pub const HEARTBEAT_STALE_NS: u64 = 10 * 1_000_000_000;

/// Whether the BPF programs are attached and their events reach userspace
/// and, in Kubernetes mode, whether this node's pods were listed once.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    last_heartbeat_ns: AtomicU64,
    sync_required: AtomicBool,
    synced: AtomicBool,
}

impl Readiness {
    /// Kubernetes mode: not ready before the first complete pod list.
    pub fn require_sync(&self) {
        self.sync_required.store(true, Ordering::SeqCst);
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::SeqCst);
    }

    /// The kernel's heartbeat event arrived at `timestamp_ns` (monotonic).
    pub fn heartbeat(&self, timestamp_ns: u64) {
        self.last_heartbeat_ns.store(timestamp_ns, Ordering::SeqCst);
    }

    pub fn is_ready(&self, now_ns: u64) -> bool {
        let last = self.last_heartbeat_ns.load(Ordering::SeqCst);
        self.attached.load(Ordering::SeqCst)
            && (!self.sync_required.load(Ordering::SeqCst) || self.synced.load(Ordering::SeqCst))
            && last > 0
            && now_ns.saturating_sub(last) < HEARTBEAT_STALE_NS
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_attached_and_heartbeat_is_fresh() {
        let readiness = Readiness::default();
        let now = 100 * 1_000_000_000;
        assert!(!readiness.is_ready(now));
        readiness.heartbeat(now - 1);
        assert!(!readiness.is_ready(now));
        readiness.set_attached();
        assert!(readiness.is_ready(now));
        assert!(!readiness.is_ready(now + HEARTBEAT_STALE_NS));
        readiness.require_sync();
        assert!(!readiness.is_ready(now));
        readiness.set_synced();
        assert!(readiness.is_ready(now));
    }
}
