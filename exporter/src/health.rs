//! Whether the agent works, and the monotonic clock the kernel stamps
//! events with. Written by the pipeline and the pod watch; read by
//! `/readyz` (ready: programs attached, events flowing, in Kubernetes mode
//! the node's pods listed once) and `/healthz` (alive: the pipeline turns,
//! the kernel's heartbeats arrive, the pod watch runs), so that the kubelet
//! restarts a wedged agent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A heartbeat older than this makes the agent unready.
pub const HEARTBEAT_STALE_NS: u64 = 10 * 1_000_000_000;
/// A heartbeat older than this makes the agent dead: the kernel side or
/// the ring buffer stopped delivering.
pub const HEARTBEAT_DEAD_NS: u64 = 60 * 1_000_000_000;
/// A pipeline loop that has not turned for this long is wedged (it turns
/// at least every 10 ms).
pub const PIPELINE_STALL_NS: u64 = 30 * 1_000_000_000;

/// What is wrong with an agent that is not alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stalled {
    #[error("the pipeline thread has not turned for 30 s")]
    Pipeline,
    #[error("no heartbeat from the kernel programs for 60 s")]
    Heartbeat,
    #[error("the pod watch stopped")]
    PodWatch,
}

/// Readiness and liveness, as the stages report them.
#[derive(Debug, Default)]
pub struct Health {
    attached: AtomicBool,
    attached_ns: AtomicU64,
    last_heartbeat_ns: AtomicU64,
    sync_required: AtomicBool,
    synced: AtomicBool,
    pipeline_turned_ns: AtomicU64,
    watch_stopped: AtomicBool,
}

/// Marks the pod watch stopped when dropped: when its task ends, however
/// it ends (a panic included).
#[derive(Debug)]
pub struct WatchRunning<'a>(pub &'a Health);

impl Drop for WatchRunning<'_> {
    fn drop(&mut self) {
        self.0.watch_stopped.store(true, Ordering::SeqCst);
    }
}

impl Health {
    /// The pipeline loop turned at `now_ns`.
    pub fn pipeline_turned(&self, now_ns: u64) {
        self.pipeline_turned_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Why the agent is not alive, if it is not. Before the programs are
    /// attached there is nothing to judge.
    pub fn stalled(&self, now_ns: u64) -> Option<Stalled> {
        if self.watch_stopped.load(Ordering::SeqCst) {
            return Some(Stalled::PodWatch);
        }
        if !self.attached.load(Ordering::SeqCst) {
            return None;
        }
        let turned = self.pipeline_turned_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(turned) >= PIPELINE_STALL_NS {
            return Some(Stalled::Pipeline);
        }
        let last = self
            .last_heartbeat_ns
            .load(Ordering::SeqCst)
            .max(self.attached_ns.load(Ordering::SeqCst));
        (now_ns.saturating_sub(last) >= HEARTBEAT_DEAD_NS).then_some(Stalled::Heartbeat)
    }

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

    /// The programs are attached; the pipeline starts at `now_ns`.
    pub fn set_attached(&self, now_ns: u64) {
        self.attached_ns.store(now_ns, Ordering::SeqCst);
        self.pipeline_turned(now_ns);
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
        let health = Health::default();
        let now = 100 * 1_000_000_000;
        assert!(!health.is_ready(now));
        health.heartbeat(now - 1);
        assert!(!health.is_ready(now));
        health.set_attached(now - 1);
        assert!(health.is_ready(now));
        assert!(!health.is_ready(now + HEARTBEAT_STALE_NS));
        health.require_sync();
        assert!(!health.is_ready(now));
        health.set_synced();
        assert!(health.is_ready(now));
    }

    #[test]
    fn alive_while_the_pipeline_turns_heartbeats_arrive_and_the_watch_runs() {
        let health = Health::default();
        let start = 1_000 * 1_000_000_000;
        assert_eq!(
            health.stalled(start),
            None,
            "nothing to judge before attaching"
        );
        health.set_attached(start);
        assert_eq!(health.stalled(start + PIPELINE_STALL_NS / 2), None);
        // Turning, but no heartbeat ever came.
        health.pipeline_turned(start + HEARTBEAT_DEAD_NS);
        assert_eq!(
            health.stalled(start + HEARTBEAT_DEAD_NS),
            Some(Stalled::Heartbeat)
        );
        health.heartbeat(start + HEARTBEAT_DEAD_NS);
        assert_eq!(health.stalled(start + HEARTBEAT_DEAD_NS), None);
        // The loop stops turning.
        let later = start + HEARTBEAT_DEAD_NS + PIPELINE_STALL_NS;
        health.heartbeat(later);
        assert_eq!(health.stalled(later), Some(Stalled::Pipeline));
        health.pipeline_turned(later);
        assert_eq!(health.stalled(later), None);
        // The watch's task ends.
        drop(WatchRunning(&health));
        assert_eq!(health.stalled(later), Some(Stalled::PodWatch));
    }
}
