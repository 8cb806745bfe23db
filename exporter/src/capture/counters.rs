//! The capture stage's counters, and the kernel side's per-CPU counts
//! mirrored into them.

use aya::maps::{MapData, PerCpuArray};
use exporter_common::{FILTERED_NAMES, MAP_NAMES};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::warn;

use crate::telemetry::{Budget, Budgets, counter, gauge};

use super::program_stats::ProgramStats;

/// What the capture stage counts. The stage owns these counters: `/metrics`
/// reads them as they are.
#[derive(Clone, Debug)]
pub struct CaptureCounters {
    pub events_read: IntCounter,
    /// Bytes of those events: what the kernel copied for userspace.
    pub event_bytes_read: IntCounter,
    /// Mirrors the kernel's own count (the `LOST_EVENTS` map).
    pub events_lost: IntCounter,
    pub events_malformed: IntCounter,
    /// Mirror the kernel's counts of failed map inserts, by map
    /// ([`MAP_NAMES`] order).
    pub map_insert_failures: Vec<IntCounter>,
    /// Mirror the kernel's counts of connections it stopped following, by
    /// how ([`FILTERED_NAMES`] order).
    pub connections_ignored: Vec<IntCounter>,
    /// Listening sockets whose connections the kernel does not follow.
    pub listeners_ignored: IntGauge,
    /// Listener verdicts past what this side remembers.
    pub ignored_listeners_budget: IntCounter,
    /// Processes found with nothing to follow: the kernel no longer looks
    /// past their pid.
    pub processes_ignored: IntCounter,
    /// Processes the kernel side treats as servers.
    pub server_processes: IntGauge,
    /// Server processes past what this side remembers.
    pub server_processes_budget: IntCounter,
    /// The kernel programs' runs and run time.
    pub(super) programs: ProgramStats,
}

impl CaptureCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_kernel_map_insert_failures_total",
                "Inserts into the kernel side's maps that failed, by map: what they would have followed is not seen",
            ),
            &["map"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let ignored = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_connections_ignored_total",
                "Connections the kernel side stopped following, by how: at accept, because their listener is not HTTP or not monitored (listener) or their container's cgroup is not monitored (cgroup), or once the connection showed it (connection)",
            ),
            &["by"],
        )?;
        registry.register(Box::new(ignored.clone()))?;
        Ok(CaptureCounters {
            ignored_listeners_budget: budgets.counter(Budget::IgnoredListeners),
            server_processes_budget: budgets.counter(Budget::ServerProcesses),
            server_processes: gauge(
                registry,
                "flask_ebpf_exporter_server_processes",
                "Processes the kernel side looks at past its first check: those that held a listening socket when the agent started or accepted a followed connection since, until they exit or are found to serve nothing to follow",
            )?,
            processes_ignored: counter(
                registry,
                "flask_ebpf_exporter_processes_ignored_total",
                "Times a process was found with nothing to follow (each listening socket it holds is not HTTP, not monitored, or holds no connection): the kernel then stops at its pid, until one of its connections is followed again",
            )?,
            connections_ignored: FILTERED_NAMES
                .iter()
                .map(|name| ignored.with_label_values(&[*name]))
                .collect(),
            listeners_ignored: gauge(
                registry,
                "flask_ebpf_exporter_listeners_ignored",
                "Listening sockets whose connections are not followed (not HTTP, or not monitored); one in 64 of their connections still is, so that a change is noticed",
            )?,
            map_insert_failures: MAP_NAMES
                .iter()
                .map(|name| failures.with_label_values(&[*name]))
                .collect(),
            events_read: counter(
                registry,
                "flask_ebpf_exporter_events_read_total",
                "Events read from the BPF ring buffer",
            )?,
            event_bytes_read: counter(
                registry,
                "flask_ebpf_exporter_event_bytes_read_total",
                "Bytes of the events read from the BPF ring buffer (headers and copied payload)",
            )?,
            events_lost: counter(
                registry,
                "flask_ebpf_exporter_events_lost_total",
                "Events the kernel dropped because the ring buffer was full",
            )?,
            events_malformed: counter(
                registry,
                "flask_ebpf_exporter_events_malformed_total",
                "Ring buffer records that did not decode as events",
            )?,
            programs: ProgramStats::register(registry)?,
        })
    }
}

/// Sums one slot of a per-CPU counter array (0 when unreadable, logged).
pub(super) fn per_cpu_sum(array: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    match array.get(&slot, 0) {
        Ok(per_cpu) => per_cpu.iter().sum(),
        Err(error) => {
            warn!(%error, "could not read a kernel counter");
            0
        }
    }
}

/// Brings a counter up to a total the kernel keeps; whether it grew.
pub(super) fn mirror(counter: &IntCounter, total: u64) -> bool {
    let counted = counter.get();
    if total <= counted {
        return false;
    }
    counter.inc_by(total - counted);
    true
}
